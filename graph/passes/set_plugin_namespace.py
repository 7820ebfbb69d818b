"""Write on every `jamba` node the attributes TensorRT's ONNX parser finds its plugin by.

The parser (onnx-tensorrt's FallbackPluginImporter) looks a custom node up in the plugin registry
by (op_type, attribute `plugin_version`, attribute `plugin_namespace`): version default "1",
namespace default "" and matched exactly; the node's domain is not read. Our QDP plugins are
registered as `jamba::<name>` version "1" ("" is a namespace tensorrt.plugin refuses), so without
these attributes every node fails with "Plugin not found". `aot=1` makes the parser ask for the
ahead-of-time implementation (the engine holds the kernels; no Python runs at inference).

Values come from the plugin descriptors (plugins/tensorrt, pure Python), the same table the
plugins register from; a jamba node with no plugin is refused here, not by the parser. Runs last in
the TensorRT pass list: the attributes are not in the ONNX schemas of the jamba ops."""

from __future__ import annotations

import onnx
from onnx import helper

from jambatrt.errors import ArtifactError

ATTRIBUTES = ("plugin_namespace", "plugin_version", "aot")


def set_plugin_namespace(model: onnx.ModelProto, settings=None) -> onnx.ModelProto:
    from jambatrt.export.ops import DOMAIN
    from jambatrt.plugins.tensorrt import descriptors

    table = descriptors()
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        d = table.get(node.op_type)
        if d is None:
            raise ArtifactError(f"node {node.name!r}: {DOMAIN}::{node.op_type} has no TensorRT plugin "
                                f"(accepted: {', '.join(sorted(table))})")
        keep = [a for a in node.attribute if a.name not in ATTRIBUTES]
        del node.attribute[:]
        node.attribute.extend(keep + [helper.make_attribute("plugin_namespace", d.namespace),
                                      helper.make_attribute("plugin_version", d.version),
                                      helper.make_attribute("aot", 1)])
    return model
