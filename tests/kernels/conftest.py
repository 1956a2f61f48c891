import pytest


@pytest.fixture(scope="session", autouse=True)
def kernels_installed():
    import flame.kernels

    flame.kernels.install()
