"""Serving bundles: manifest with checksums, Triton model repository, atomic writing, verified loading."""

from .atomic import BundleError, atomic_output_dir, check_out_dir
from .loader import load_bundle, open_bundle, read_verified, verify_bundle
from .manifest import MANIFEST_VERSION, Manifest, collect_environment
from .triton import triton_config, write_model_repository
from .writer import write_bundle

__all__ = [
    "BundleError",
    "MANIFEST_VERSION",
    "Manifest",
    "atomic_output_dir",
    "check_out_dir",
    "collect_environment",
    "load_bundle",
    "open_bundle",
    "read_verified",
    "triton_config",
    "verify_bundle",
    "write_bundle",
    "write_model_repository",
]
