"""GGUF export of a transformers checkpoint, so llama.cpp can serve it.

The conversion is llama.cpp's own ``convert_hf_to_gguf.py`` (never a hand-written GGUF
writer): it makes the f16 file, and libllama's ``llama_model_quantize`` (through the
``llama_cpp`` bindings of llama-cpp-python) makes q8_0 and q4_0 from it.

No wheel on PyPI ships the converter; the source package of llama-cpp-python vendors
llama.cpp, and ``cai serve-setup`` copies the converter (with its ``conversion`` package
and the ``gguf-py`` it is written against) from it into :func:`tools_dir`, for the
llama.cpp version the installed ``llama_cpp`` was built from. ``CAI_LLAMA_CPP_DIR`` can
point at a llama.cpp source tree instead.

Exports are cached by the checkpoint's content hash: ``<cache>/gguf/<hash>/model-<type>.gguf``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from cai.errors import CaiError

TYPES = ("f16", "q8_0", "q4_0")
LLAMA_CPP_PIP = "llama-cpp-python[server]==0.3.36"
CONVERTER = "convert_hf_to_gguf.py"
#: What the converter needs beside itself, copied from llama.cpp's source tree.
CONVERTER_PARTS = (CONVERTER, "conversion", "gguf-py")


def _llama_cpp_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("llama_cpp_python")
    except (ImportError, PackageNotFoundError):
        return None


def tools_dir() -> Path:
    """Where ``cai serve-setup`` puts llama.cpp's converter (and the server it may build)."""
    from cai.models import cache_root

    return cache_root() / "llama.cpp" / (_llama_cpp_version() or "none")


def find_converter() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py``, or a one-line error saying how to get it."""
    env = os.environ.get("CAI_LLAMA_CPP_DIR")
    if env:
        script = Path(env) / CONVERTER
        if not script.is_file():
            raise CaiError(f"CAI_LLAMA_CPP_DIR='{env}' has no {CONVERTER}; point it at a llama.cpp source tree")
        return script
    script = tools_dir() / CONVERTER
    if not script.is_file():
        raise CaiError(
            f"GGUF export needs llama.cpp's {CONVERTER}, which no installed package ships; run `cai serve-setup` "
            "(copies it from llama-cpp-python's source package) or set CAI_LLAMA_CPP_DIR to a llama.cpp checkout"
        )
    return script


def checkpoint_hash(folder: str | Path) -> str:
    """sha256 over a ``save_pretrained`` folder's files (names and contents)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    """A GGUF file's sha256, kept beside it (``<file>.sha256``) once computed."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if side.is_file() and side.stat().st_mtime >= path.stat().st_mtime:
        return side.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    side.write_text(h.hexdigest() + "\n")
    return h.hexdigest()


def _convert(folder: str, out: Path, progress: Callable[[str], None]) -> None:
    script = find_converter()
    tmp = out.with_name(out.name + ".tmp")
    cmd = [sys.executable, str(script), str(folder), "--outfile", str(tmp), "--outtype", "f16"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        tmp.unlink(missing_ok=True)
        missing = next((ln.split("No module named ")[1].strip("'\"") for ln in lines if "No module named " in ln), None)
        if missing:
            raise CaiError(f"GGUF export needs the Python package '{missing.split('.')[0]}' for llama.cpp's converter; "
                           f"pip install {missing.split('.')[0]}  (or: pip install -e '.[serve]')")
        raise CaiError(f"GGUF export of '{folder}' failed ({script.name} exited with {proc.returncode}): "
                       + " | ".join(lines[-3:]))
    os.replace(tmp, out)


def _quantize(src: Path, out: Path, qtype: str) -> None:
    try:
        import llama_cpp
    except ImportError:
        raise CaiError(f"GGUF quantization to {qtype} needs libllama's llama_model_quantize; "
                       f"pip install '{LLAMA_CPP_PIP}'") from None
    ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[qtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    tmp = out.with_name(out.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise CaiError(f"llama_model_quantize of {src} to {qtype} failed (return code {rc})")
    os.replace(tmp, out)


def export_gguf(folder: str | Path, qtype: str = "f16", progress: Callable[[str], None] = print) -> Path:
    """The GGUF of a checkpoint folder at ``qtype``, exported once per checkpoint content."""
    from cai.models import _file_lock, cache_root

    if qtype not in TYPES:
        raise CaiError(f"config field 'engine.serve_quant': '{qtype}' is not one of {', '.join(TYPES)}")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CaiError(f"GGUF export: '{folder}' is not a save_pretrained checkpoint (no config.json)")
    target = cache_root() / "gguf" / checkpoint_hash(folder)[:20]
    out = target / f"model-{qtype}.gguf"
    if out.is_file():
        return out
    target.mkdir(parents=True, exist_ok=True)
    with _file_lock(target / ".lock"):
        if out.is_file():
            return out
        f16 = target / "model-f16.gguf"
        if not f16.is_file():
            progress(f"engine: exporting {folder} to GGUF f16 with llama.cpp's converter (once per checkpoint)...")
            _convert(str(folder), f16, progress)
            (target / "source.txt").write_text(str(folder) + "\n")
        if qtype != "f16":
            progress(f"engine: quantizing the GGUF to {qtype} with llama_model_quantize...")
            _quantize(f16, out, qtype)
    return out


# -- cai serve-setup -------------------------------------------------------------------------


def setup_tools(build_server: bool = False, log: Callable[[str], None] = print, jobs: int | None = None) -> Path:
    """Copy llama.cpp's converter out of llama-cpp-python's source package (downloaded by pip,
    the version that is installed) into :func:`tools_dir`; with ``build_server``, also build
    llama.cpp's ``llama-server`` there with CMake (portable, GGML_NATIVE=OFF)."""
    version = _llama_cpp_version()
    if version is None:
        raise CaiError(f"serving needs llama-cpp-python; pip install '{LLAMA_CPP_PIP}' first")
    dest = tools_dir()
    have_converter = (dest / CONVERTER).is_file()
    have_server = (dest / "bin" / "llama-server").is_file()
    if have_converter and (have_server or not build_server):
        log(f"llama.cpp tools already in {dest}")
        return dest
    with tempfile.TemporaryDirectory(prefix="cai-llama-src-") as tmp:
        log(f"downloading llama-cpp-python {version}'s source package (it vendors llama.cpp)...")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "-d", tmp, f"llama-cpp-python=={version}"], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            tail = " | ".join([ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-2:])
            raise CaiError(f"pip could not download llama-cpp-python=={version}'s source package: {tail}")
        root = f"{sdists[0].name[: -len('.tar.gz')]}/vendor/llama.cpp/"
        wanted = ("CMakeLists.txt", "cmake/", "common/", "ggml/", "include/", "src/", "tools/", "vendor/",
                  "licenses/", "LICENSE") if build_server else ()
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(root) and (
                any(m.name[len(root):].startswith(p) for p in CONVERTER_PARTS + wanted))]
            tar.extractall(tmp, members=members, filter="data")
        src = Path(tmp) / root
        stage = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        for part in CONVERTER_PARTS:
            (shutil.copytree if (src / part).is_dir() else shutil.copy2)(src / part, stage / part)
        if have_server:
            shutil.copytree(dest / "bin", stage / "bin")
        elif build_server:
            _build_server(src, stage / "bin", log, jobs)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(stage, dest)
    log(f"llama.cpp tools for llama-cpp-python {version} in {dest}")
    return dest


def _build_server(src: Path, bin_dir: Path, log: Callable[[str], None], jobs: int | None) -> None:
    if shutil.which("cmake") is None:
        raise CaiError("building llama-server needs cmake and a C++ compiler (apt-get install cmake g++)")
    build = src / "build"
    log("building llama.cpp's llama-server (portable CPU build; several minutes)...")
    flags = ["-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
             "-DLLAMA_BUILD_SERVER=ON", "-DCMAKE_BUILD_TYPE=Release"]
    for cmd in (["cmake", "-S", str(src), "-B", str(build), *flags],
                ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs or os.cpu_count() or 1)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " | ".join([ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()][-3:])
            raise CaiError(f"building llama-server failed ({' '.join(cmd[:3])}): {tail}")
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / "bin" / "llama-server", bin_dir / "llama-server")
