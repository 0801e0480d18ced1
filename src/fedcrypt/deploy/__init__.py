"""Deployment across sites on Flower's deployment engine, and its local multi-site harness.

Modules: :mod:`~.tls` (CA, SuperLink certificate, SuperNode keys), :mod:`~.processes`
(ports, process groups), :mod:`~.flwr_cli` (the operator's ``flwr`` CLI) and
:mod:`~.harness` (:func:`deploy_locally`: every party of a real deployment on this
machine, over TLS with SuperNode authentication).
"""

from fedcrypt.deploy.harness import DeploymentResult, deploy_locally
from fedcrypt.deploy.tls import TlsFiles, make_node_key_pair, make_tls_files

__all__ = ["DeploymentResult", "TlsFiles", "deploy_locally", "make_node_key_pair", "make_tls_files"]
