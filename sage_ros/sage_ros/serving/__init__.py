# SPDX-License-Identifier: Apache-2.0
"""Server-model backends of the cloud: in-process (default) or a Ray Serve deployment."""

from sage_ros.serving.local import LocalBackend, ServerBackend

__all__ = ['LocalBackend', 'ServerBackend']
