"""Process set-up: which GPUs JAX may see (from a fake environment), the allocator's platform."""

import pytest

from minigpt_jax import host


def test_listed_gpus_become_the_visible_ones_renumbered():
    r = host.restrict_gpus([5, 1, 3, 1], {}, cuda=True, count=8)
    assert r.env == {"CUDA_VISIBLE_DEVICES": "1,3,5", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert r.index == {1: 0, 3: 1, 5: 2}  # JAX numbers the visible GPUs 0, 1, 2 in that order


def test_indices_that_do_not_exist_are_left_out():
    r = host.restrict_gpus([1, 2, 3, 4, 5], {}, cuda=True, count=4)
    assert r.env["CUDA_VISIBLE_DEVICES"] == "1,2,3" and r.index == {1: 0, 2: 1, 3: 2}
    # none exists: every GPU stays visible (docs/spec.md), and the caller maps nothing
    none = host.restrict_gpus([7, 9], {}, cuda=True, count=4)
    assert "CUDA_VISIBLE_DEVICES" not in none.env and none.index is None
    # the count unknown: the list is kept in ascending order, which CUDA reads up to the
    # first index that does not exist
    assert host.restrict_gpus([9, 0], {}, cuda=True).env["CUDA_VISIBLE_DEVICES"] == "0,9"


def test_the_users_own_settings_are_kept():
    env = {"CUDA_VISIBLE_DEVICES": "2,3", "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    r = host.restrict_gpus([0, 1], env, cuda=True, count=8)
    assert r.env == {} and r.index is None
    assert host.restrict_gpus(None, {}, cuda=True).env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


@pytest.mark.parametrize(
    "environ, cuda",
    [({}, False), ({"JAX_PLATFORMS": "cpu"}, True), ({"JAX_PLATFORMS": "tpu,cpu"}, True)],
)
def test_nothing_changes_off_cuda(environ, cuda):
    r = host.restrict_gpus([1, 2], environ, cuda=cuda, count=4)
    assert r.env == {} and r.index is None


def test_jax_platforms_naming_cuda_restricts_even_without_a_detected_plugin():
    for platforms in ("cuda", "gpu,cpu"):
        r = host.restrict_gpus([1], {"JAX_PLATFORMS": platforms}, cuda=False, count=2)
        assert r.env["CUDA_VISIBLE_DEVICES"] == "1" and r.index == {1: 0}


def test_restrict_gpus_leaves_the_environment_alone():
    environ = {"PATH": "/bin"}
    host.restrict_gpus([0], environ, cuda=True, count=1)
    assert environ == {"PATH": "/bin"}


def test_gpu_count_reads_the_driver_device_files(tmp_path):
    assert host.gpu_count(str(tmp_path)) is None  # no driver
    for name in ("nvidiactl", "nvidia-uvm", "nvidia0", "nvidia1", "nvidia3"):
        (tmp_path / name).touch()
    assert host.gpu_count(str(tmp_path)) == 3


def test_allocator_is_tuned_only_for_the_cpu_platform():
    assert host.tune_host_allocator("gpu") is False
    assert host.tune_host_allocator("tpu") is False
