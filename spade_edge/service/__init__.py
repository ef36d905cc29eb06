"""The inspection service (``spade-edge serve``) and the watch-folder mode (``spade-edge watch``).

Standard library only on top of the runtime: ``http.server`` for HTTP, one worker thread that owns
the detector, polling for the watched folder.
"""

from .inspector import InspectionService, ServiceConfig
from .server import RunningService, make_server

__all__ = ["InspectionService", "ServiceConfig", "RunningService", "make_server"]
