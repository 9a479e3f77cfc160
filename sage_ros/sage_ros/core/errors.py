# SPDX-License-Identifier: Apache-2.0
"""Exceptions of the core library, so callers can tell failures apart."""

from __future__ import annotations


class SageError(Exception):
    """Base class of every error raised by sage_ros.core."""


class WeightsError(SageError):
    """Configured model weights cannot be loaded."""


class PreprocessError(SageError, ValueError):
    """A camera frame cannot be turned into a model input."""


class SelectionError(SageError, ValueError):
    """Invalid arguments to a patch selection method."""


class CodecError(SageError, ValueError):
    """Patches cannot be encoded, or a payload cannot be decoded."""


class BudgetError(SageError, ValueError):
    """A request cannot be made to fit its budget."""
