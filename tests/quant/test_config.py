"""QuantConfig: every bad value is named in the error with what is accepted."""

from __future__ import annotations

import pytest

from apiq_jax.quant import (
    QuantConfig,
)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=5), "bits=5"),
        (dict(bits=8, scheme="nf"), "bits=8"),
        (dict(group_size=0), "group_size=0"),
        (dict(group_size=-64), "group_size=-64"),
        (dict(scheme="fp4"), "scheme='fp4'"),
        (dict(scale_dtype="int8"), "scale_dtype='int8'"),
    ],
)
def test_config_errors_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)
