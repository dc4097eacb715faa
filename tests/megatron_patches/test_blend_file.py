"""A blend file that is not a mapping is refused in one line naming the file."""

from pathlib import Path

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.formats.blend import load_blend


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_non_mapping_blend_is_refused_in_one_line(tmp_path: Path, text: str):
    blend = tmp_path / "blend.yaml"
    blend.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_blend(blend)
    assert str(blend) in str(err.value) and "mapping" in str(err.value)
    assert "\n" not in str(err.value)
