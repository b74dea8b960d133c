"""nemo-eks: load the stack config, declare the stack, export its outputs."""

import pulumi

from infra import config, program

try:
    stack_config = config.from_pulumi()
except config.ConfigError as error:
    # A clean message naming the key, not a traceback; raised before any resource is declared.
    raise pulumi.RunError(str(error)) from None

for key, value in program.build(stack_config).items():
    pulumi.export(key, value)
