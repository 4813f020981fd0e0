"""Layer-plan grammar (model.plan): ranges a plan cannot mean are refused in one line."""

import pytest

from ladder_jax.config import ConfigError, load_config
from ladder_jax.plan import parse_plan


def test_a_range_with_no_start_end_or_a_minus_zero_index_is_refused():
    assert parse_plan("standard,ladder@-2:", 4) == ("standard", "standard", "ladder", "ladder")
    assert parse_plan("lp@0:", 4) == ("lp",) * 4
    with pytest.raises(ConfigError, match=r"'ladder@' has no layer range after '@'; write SCHEDULE@START:END"):
        parse_plan("ladder@", 4)
    with pytest.raises(ConfigError, match=r"'lp@-0:' has layer index '-0', which is layer 0 \(not the end\)"):
        parse_plan("lp@-0:", 4)
    with pytest.raises(ConfigError, match=r"'standard,ladder@' has no layer range|'ladder@' has no layer range"):
        load_config("tiny", ["model.plan=standard,ladder@"])
