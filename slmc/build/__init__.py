"""`slmc build`: an app's models (slmc.toml) compiled per platform through a shared,
content-addressed cache, with slmc.lock and a Make/Ninja depfile (runner.py)."""

from .config import BuildConfig, load as load_config
from .runner import build

__all__ = ["BuildConfig", "build", "load_config"]
