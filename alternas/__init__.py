"""alternas: AlterNet architecture search by the build-up rule of Park & Kim (ICLR 2022).

Importing the package registers the ``alternet*`` models with timm.
"""

from alternas.errors import AlternasError, ConfigError, DataError, PlacementError
from alternas.models import AlterNet, build_model, get_base, list_bases, register_base
from alternas.models import timm_hub as _timm_hub  # noqa: F401  (registers the timm entrypoints)
from alternas.placement import Placement

__version__ = "0.1.0"
__all__ = [
    "AlterNet", "AlternasError", "ConfigError", "DataError", "Placement", "PlacementError", "build_model",
    "get_base", "list_bases", "register_base",
]
