import importlib
import os

import pyro
import pytest
import torch

# The `test` extra in setup.cfg: CI installs these, so a test that skips for want of one of them
# means a broken install step, not an optional feature. Under CI (CI=true) they must import.
TEST_EXTRAS = ("itk", "voxelmorph", "pydicom", "ants", "nilearn", "SimpleITK", "pandas", "playwright")


def pytest_sessionstart(session):
    if not os.environ.get("CI"):
        return
    missing = []
    for name in TEST_EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    if missing:
        pytest.exit(f"CI: test extras not importable, their tests would skip silently: {missing}", returncode=1)


@pytest.fixture(autouse=True)
def _pyro_state():
    """As in Pyro's own test-suite: clean param store, validation on, fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    torch.set_num_threads(2)
    yield
    pyro.clear_param_store()


def smooth_field(shape, amplitude=1.0, seed=0, batch=1):
    """Smooth random displacement/velocity field (B, 3, D, H, W) in voxels: low DCT modes only."""
    from groupmorph_pyro.priors import idct3

    g = torch.Generator().manual_seed(seed)
    coeff = torch.zeros(batch, 3, *shape)
    coeff[..., :3, :3, :3] = torch.randn(batch, 3, 3, 3, 3, generator=g)
    coeff[..., 0, 0, 0] = 0.0
    field = idct3(coeff)
    return amplitude * field / field.abs().amax()


def smooth_image(shape, seed=0, batch=1):
    """Smooth random image (B, 1, D, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, *shape, generator=g)
    for _ in range(3):
        x = torch.nn.functional.avg_pool3d(x, 3, 1, 1, count_include_pad=False)
    return (x - x.amin()) / (x.amax() - x.amin())
