"""The fleet's commands, gathered by the `edgefleet` command (agent/clikit.py) as one group.

Each module here holds the click layer of one command; the work is done by the fleet modules
they import when run.
"""

from __future__ import annotations

import click

from fleet.commands.artifacts import artifacts_grp
from fleet.commands.broker import broker_grp
from fleet.commands.collect import collect_cmd
from fleet.commands.demo import demo_cmd
from fleet.commands.deploy import deploy_cmd
from fleet.commands.device import device_grp
from fleet.commands.feedback import feedback_grp
from fleet.commands.keys import keys_grp
from fleet.commands.publish import publish_cmd
from fleet.commands.view import fleet_grp

cli = click.Group(
    "fleet-commands",
    commands=[
        keys_grp,
        publish_cmd,
        deploy_cmd,
        device_grp,
        collect_cmd,
        fleet_grp,
        demo_cmd,
        broker_grp,
        artifacts_grp,
        feedback_grp,
    ],
)
