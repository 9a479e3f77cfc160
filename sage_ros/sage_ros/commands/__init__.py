# SPDX-License-Identifier: Apache-2.0
"""What the sage-ros subcommands do, beyond parsing their arguments."""
