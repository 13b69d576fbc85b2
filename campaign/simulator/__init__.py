"""`campaign simulate`: the simulator of the messaging API, moved whole into server.py.

This step only makes a package of the module: every name importable before still is.
"""

from campaign.simulator.server import *  # noqa: F403
from campaign.simulator.server import (  # noqa: F401
    __all__,
    _Context,
    _Report,
    merge_config,
    parse_listen,
    parse_setting,
)
