"""Other projects' code used as test oracles (test-only extras; the package never imports them).

ultralytics is AGPL-3.0: it is imported here, by tests and benchmarks only. Importing it has
side effects that must not leak into the rest of a test session: it probes the network (DNS)
unless ``YOLO_OFFLINE`` is set, writes a settings file to its config dir, and replaces
``torch.save``, torch's print options and some warning filters. :func:`ultralytics_nms`
imports it offline, with its config in a temporary folder, and puts those globals back.
"""

import os
import tempfile
import warnings

import pytest
import torch


def ultralytics_nms():
    """``ultralytics.utils.nms`` (skips the test when ultralytics is not installed)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no DNS probe, no analytics
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "retina_fast_yolo_config"))
    saved_save = torch.save
    saved_print = torch._tensor_str.get_printoptions()
    saved_filters = list(warnings.filters)
    try:
        return pytest.importorskip("ultralytics.utils.nms")
    finally:
        torch.save = saved_save
        torch.set_printoptions(**saved_print)
        warnings.filters[:] = saved_filters


def effdet_loss():
    """``effdet.loss`` (skips the test when effdet is not installed)."""
    return pytest.importorskip("effdet.loss")
