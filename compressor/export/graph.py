"""A small builder for ONNX graphs: named initializers, nodes that return their output names."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 23  # the standard domain: RMSNormalization arrived in 23
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators (MatMulNBits, GroupQueryAttention, ...)

FLOAT, INT32, INT64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


class Graph:
    """Collects nodes, initializers, inputs and outputs; every name it makes up is unique."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        """A new value name starting with ``hint``."""
        self._count += 1
        return f"{hint}/{self._count}"

    def constant(self, name: str, array: np.ndarray) -> str:
        """Add ``array`` as an initializer called ``name``; returns ``name``."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def input(self, name: str, elem_type: int, shape: list, default: np.ndarray | None = None) -> str:
        """Declare a graph input; with ``default`` it is an initializer that a feed may override."""
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        if default is not None:
            self.constant(name, default)
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        """Declare the value ``name`` as a graph output."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int | list[str] = 1, domain: str = "", **attrs):
        """Append a node; returns its output name (or the list of names, for several outputs)."""
        if isinstance(outputs, int):
            names = [self.fresh(hint or op_type) for _ in range(outputs)]
        else:
            names = list(outputs)
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.fresh(f"{hint or op_type}.node"), domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def model(self, producer: str) -> onnx.ModelProto:
        """The finished model, importing the standard opset and onnxruntime's contrib domain."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=opsets, producer_name=producer, ir_version=10)
