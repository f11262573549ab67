"""groupmorph_pyro: deep group-wise variational diffeomorphic image registration as a Pyro program.

Layers, lowest first; a module imports only modules of lower layers (lazy imports included;
``tests/test_layers.py`` checks the import graph against :data:`LAYERS`):

1. foundations: ``checks`` (validation, device resolution, name registry), ``files`` (atomic
   writes), ``results`` (the result type every registration method returns)
2. grids and images: ``spatial`` (warp, compose, integrate, det J, points; the only grid_sample
   caller), ``preprocess`` (normalisation, padding, patches, tiles), ``volumes`` (NIfTI; the only
   nibabel user), ``plots`` (the only matplotlib user)
3. building blocks: ``group`` (GroupTransform: latents -> maps, inverse maps, det J, warped group),
   ``priors``, ``likelihoods``, ``networks``, ``metrics``, ``synthetic`` (phantoms), ``data``
   (DIR-Lab, DICOM, manifests), ``optim`` (the per-case fits' Adam and Nesterov SGD)
4. model: ``model`` (Pyro model and guides), ``posterior`` (sampling, uncertainty, arviz),
   ``config``, ``outputs`` (what ``register`` writes), ``prepare`` (data sets -> NIfTI + manifest)
5. inference: ``registration`` (prepare -> infer -> refine -> summarise -> sample), ``train``;
   ``report`` (the QC page of an output folder), ``memory`` (the peak a registration will need,
   against what is available)
6. workflows: ``baselines`` (identity, Elastix, pairwise), ``batch`` (the manifest loop), ``transfer``
   (apply a stored registration to images, label maps and points)
7. analyses: ``derived`` (trajectories, ventilation, the mid-position image and enhancement curves
   from a stored registration)
8. comparison: ``peers`` (the voxelmorph package), ``evaluation`` (Table-1 metrics)
9. interface: ``cli``
"""
from .checks import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__", "LAYERS", "apply_registration"]


def apply_registration(registration, source, target, **kwargs):
    """Apply a stored registration to an image, label map or points: see
    :func:`groupmorph_pyro.transfer.apply_registration` (imported on first use, so that importing the
    package stays light)."""
    from .transfer import apply_registration as apply

    return apply(registration, source, target, **kwargs)

LAYERS = (
    ("checks", "files", "results"),
    ("spatial", "preprocess", "volumes", "plots"),
    ("group", "priors", "likelihoods", "networks", "metrics", "synthetic", "data", "optim"),
    ("model", "posterior", "config", "outputs", "prepare"),
    ("registration", "train", "report", "memory"),
    ("baselines", "batch", "transfer"),
    ("derived",),
    ("peers", "evaluation"),
    ("cli",),
)
"""The package's modules by layer, lowest first (see the module docstring)."""
