"""``load_base_model`` hides transformers' "Loading weights" tqdm bar for its own load only: the
user's progress-bar settings (transformers' and huggingface_hub's) are the same afterwards."""

from __future__ import annotations

import huggingface_hub.utils as hf_hub_utils
import pytest
from transformers.utils import logging as hf_logging

from spd_host.models import load_base_model


@pytest.mark.parametrize("enabled", [True, False])
def test_no_loading_bar_and_settings_restored(
    enabled: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (hf_logging.is_progress_bar_enabled(), hf_hub_utils.are_progress_bars_disabled())
    try:
        if enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()
        load_base_model("demo")
        captured = capsys.readouterr()
        assert "Loading weights" not in captured.err + captured.out
        assert hf_logging.is_progress_bar_enabled() is enabled
        assert hf_hub_utils.are_progress_bars_disabled() is (not enabled)
    finally:
        if before[0]:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()
        if before[1]:
            hf_hub_utils.disable_progress_bars()
        else:
            hf_hub_utils.enable_progress_bars()


def test_the_bar_exists_without_the_switch(capsys: pytest.CaptureFixture[str]) -> None:
    """The reference: a plain ``from_pretrained`` with bars enabled does print the bar (so the
    test above would fail if ``load_base_model`` stopped hiding it)."""
    from transformers import AutoModelForCausalLM

    from spd_host.demo import demo_model_dir

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        AutoModelForCausalLM.from_pretrained(str(demo_model_dir()))
    finally:
        if not was:
            hf_logging.disable_progress_bar()
    captured = capsys.readouterr()
    assert "Loading weights" in captured.err
