import pytest

from lightning_fms.testing.surrogates import learning_curve_rows


@pytest.fixture(scope="session")
def data():
    """Rows of 10 synthetic trials to fit on and of 12 others to predict: ``(train, y, test, y_test)``.

    Three hyperparameters and curves of up to 8 epochs (``learning_curve_rows``' defaults).
    """
    train, y = learning_curve_rows(10, seed=0)
    test, y_test = learning_curve_rows(12, seed=1)
    return train, y, test, y_test
