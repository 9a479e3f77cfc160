# SPDX-License-Identifier: Apache-2.0
"""Offline evaluation: bags of labelled frames, replay, and the paper's sweeps."""
