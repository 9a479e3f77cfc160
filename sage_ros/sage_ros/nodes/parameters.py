# SPDX-License-Identifier: Apache-2.0
"""Declaring node parameters with descriptors, defaults taken from config/sage_ros.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter

from sage_ros.params import check_topics, load_params


@dataclass(frozen=True)
class Spec:
    """What a parameter means and which values it takes."""

    description: str
    read_only: bool = False
    int_range: tuple[int, int] | None = None
    float_range: tuple[float, float] | None = None
    choices: Sequence[str] = ()

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(description=self.description, read_only=self.read_only)
        if self.int_range:
            d.integer_range = [IntegerRange(from_value=self.int_range[0], to_value=self.int_range[1], step=1)]
        if self.float_range:
            d.floating_point_range = [FloatingPointRange(
                from_value=self.float_range[0], to_value=self.float_range[1], step=0.0)]
        if self.choices:
            d.additional_constraints = 'one of: ' + ', '.join(self.choices)
        return d

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None."""
        if self.choices and value not in self.choices:
            return f'must be one of {", ".join(self.choices)}'
        if self.int_range and not self.int_range[0] <= value <= self.int_range[1]:
            return f'must be in {self.int_range[0]}..{self.int_range[1]}'
        if self.float_range and not self.float_range[0] <= value <= self.float_range[1]:
            return f'must be in {self.float_range[0]}..{self.float_range[1]}'
        return None


def declare(node: Node, node_name: str, specs: dict[str, Spec]) -> dict[str, Any]:
    """Declare every parameter of ``node_name`` (defaults: the shipped YAML) and return the values.

    Values given on the command line or in a params file override the defaults, as usual in
    ROS. Names in the YAML without a spec are declared too, without constraints.
    """
    defaults = load_params(node_name)
    missing = set(specs) - set(defaults)
    if missing:
        raise KeyError(f'config/sage_ros.yaml lacks parameters {sorted(missing)} of {node_name}')
    for name, default in defaults.items():
        if node.has_parameter(name):  # use_sim_time: every rclpy node declares it itself
            continue
        spec = specs.get(name, Spec(''))
        node.declare_parameter(name, default, spec.descriptor())
    values = {name: node.get_parameter(name).value for name in defaults}
    for name, spec in specs.items():
        why = spec.problem(values[name])
        if why:
            raise ValueError(f'parameter {name}={values[name]!r} {why}')
    # One line naming the parameter, before rclpy's multi-line exception from create_publisher.
    check_topics(node_name, values, namespace=node.get_namespace())
    return values


def validator(specs: dict[str, Spec]):
    """An on-set-parameters callback that checks choices and ranges with a reason."""

    def check(params: list[Parameter]) -> SetParametersResult:
        for p in params:
            spec = specs.get(p.name)
            why = spec.problem(p.value) if spec else None
            if why:
                return SetParametersResult(successful=False, reason=f'{p.name} {why}')
        return SetParametersResult(successful=True)

    return check
