"""Conditional normalizing flows of iCaloFlow: architecture specs, presets and the nflows builders."""
