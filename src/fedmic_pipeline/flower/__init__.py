"""Flower transport over the federated core: the same algorithms, run on real nodes.

The core (``fedmic_pipeline.core``) defines one round protocol -- ``init_server``,
``init_client``, ``client_update``, ``aggregate`` -- over flat dicts of tensors. This
package only carries those dicts between processes with Flower's Message API; it holds
no algorithm logic:

* ``task``: run/node configuration, loading a node's own partition, building the algorithm;
* ``records``: payload <-> ``ArrayRecord`` (lossless, dtype-preserving), the client's
  private state <-> ``context.state``, and the serialized size of a message;
* ``client_app``: the ``ClientApp`` (query / train / evaluate handlers);
* ``server_app``: the ``ServerApp`` main loop (sampling, aggregation, failures, MLflow);
* ``launch``: a loopback deployment (one SuperLink, N SuperNodes) for a laptop or CI.

Modules are imported lazily by Flower through the ``[tool.flwr.app.components]`` refs;
importing this package imports neither Flower nor torch.
"""

__all__: list[str] = []
