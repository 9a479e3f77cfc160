# SPDX-License-Identifier: Apache-2.0
"""Live-system benchmarks and their tools: they print figures, tests assert none."""
