import pytest

from megatron_patches.compat import MegatronVersionError, installed_megatron_core, require_signature


def test_pinned_megatron_core_is_installed():
    assert installed_megatron_core() == "0.16.1"


def test_matching_signature_passes():
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    require_signature(model_parallel_cuda_manual_seed, ["seed", "te_rng_tracker"])


def test_drifted_signature_names_function_and_parameters():
    def wrapped(seed, new_flag):
        pass

    with pytest.raises(MegatronVersionError) as err:
        require_signature(wrapped, ["seed", "old_flag"])
    message = str(err.value)
    assert "wrapped has parameters ['seed', 'new_flag'], expected ['seed', 'old_flag']" in message
    assert "megatron-core==0.16.1" in message
