"""nemo-eks: load the stack config, declare the stack, export its outputs."""

import os
from pathlib import Path

import pulumi
import yaml

from infra import config, program


def check_stack_file() -> None:
    """Read the stack file again through the one stack-file reader. The Pulumi CLI has already parsed it, but with
    a YAML decoder that keeps the last of two equal keys without a word (pulumi/pulumi
    sdk/go/common/workspace/loaders.go: encoding.YAML, gopkg.in/yaml.v2 ``Unmarshal``, non-strict); the program
    only sees the result. The namespaces are checked again by ``config.load`` on what the CLI hands over, so a
    stack whose config comes from elsewhere (``--config-file``, an ESC environment) is checked too."""
    # The project root, where Pulumi.yaml is; the language host also starts the program there.
    roots = [Path(d) for d in (pulumi.get_root_directory(), os.getcwd()) if d and (Path(d) / "Pulumi.yaml").is_file()]
    if not roots:
        return
    root = roots[0]
    project = yaml.safe_load((root / "Pulumi.yaml").read_text()) or {}
    path = root / project.get("stackConfigDir", ".") / f"Pulumi.{pulumi.get_stack()}.yaml"
    if path.exists():
        config.read_stack_file(path, str(path.relative_to(root)))


try:
    check_stack_file()
    stack_config = config.from_pulumi()
except (config.ConfigError, config.StackFileError) as error:
    # A clean message naming the key, not a traceback; raised before any resource is declared.
    raise pulumi.RunError(str(error)) from None

for key, value in program.build(stack_config).items():
    pulumi.export(key, value)
