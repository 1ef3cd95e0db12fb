"""Report generation: vision towers, the Q-Former bridge, language model, report data and metrics.

``blip.convert_lavis`` (LAVIS checkpoint conversion) is imported on demand so that
``sam3d-convert-lavis`` runs it as a fresh module.
"""

from blip.qformer import QFormerBridge, QFormerBridgeConfig, QFormerBridgeOutput

__all__ = ["QFormerBridge", "QFormerBridgeConfig", "QFormerBridgeOutput"]
