"""`get_provider(name)` reads an explicit name as `FD_MOE_OPS_PROVIDER` is read (issue 15 item 9).

NOTE FOR THE LEAD: written by the `rel` helper, who may not edit backend/ops/ (arch-b's branch owns
it). On main these tests fail: `get_provider("Paddle")` raises "name: expected one of ..." while
FD_MOE_OPS_PROVIDER=" Paddle " selects the paddle provider (`backend.envs.get_ops_provider_name`
strips and lower-cases). The fix belongs in `backend.ops._requested_name`: normalize a str name
with the same rule (ideally one helper shared with backend.envs), keep the ValueError for anything
else. Merge this file together with that fix.
"""
import pytest

from backend import ops


@pytest.fixture(autouse=True)
def _fresh_cache():
    ops.reset_provider_cache()
    yield
    ops.reset_provider_cache()


@pytest.mark.parametrize("name", ["Paddle", "PADDLE", " paddle ", "paddle\t", "Auto", " AUTO"])
def test_explicit_name_ignores_case_and_spaces_like_the_variable(name, monkeypatch):
    monkeypatch.setenv("FD_MOE_OPS_PROVIDER", name)
    from_variable = ops.get_provider().name
    assert ops.get_provider(name).name == from_variable
    assert ops.get_provider(name).name == ops.get_provider(name.strip().lower()).name


@pytest.mark.parametrize("name", ["padle", "paddle provider", 3])
def test_explicit_name_that_is_no_provider_is_still_an_error(name, monkeypatch):
    monkeypatch.delenv("FD_MOE_OPS_PROVIDER", raising=False)
    with pytest.raises(ValueError, match=r"name: expected one of .* got"):
        ops.get_provider(name)
