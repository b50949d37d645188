"""cai: Constitutional AI (Bai et al. 2022) as usable software."""

__version__ = "0.1.0"

from cai.config import RunConfig, load_config  # noqa: E402
from cai.constitution import Constitution, load_constitution  # noqa: E402
from cai.errors import CaiError  # noqa: E402
from cai.prompts import Prompt, load_prompt_set  # noqa: E402

__all__ = [
    "CaiError",
    "Constitution",
    "Prompt",
    "RunConfig",
    "load_config",
    "load_constitution",
    "load_prompt_set",
]
