"""Pipelines (diffusers ``DiffusionPipeline`` subclasses) and the task registry."""

from tokenloom.pipelines.registry import load, pipeline, register_pipeline, tasks

__all__ = ["pipeline", "load", "register_pipeline", "tasks"]
