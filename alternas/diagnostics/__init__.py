"""Diagnostics of trained candidates: Hessian curvature, Fourier and variance profiles, noise robustness,
lesions and loss landscapes (PAPER.md §5-7)."""

from alternas.diagnostics.features import feature_profile, fourier_profile
from alternas.diagnostics.hessian import hessian_eigenvalues, hessian_spectrum, hutchinson_trace
from alternas.diagnostics.run import DiagnosticsConfig, diagnose

__all__ = [
    "DiagnosticsConfig", "diagnose", "feature_profile", "fourier_profile", "hessian_eigenvalues", "hessian_spectrum",
    "hutchinson_trace",
]
