"""Adapters that let a line controller speak to the inspection service in its own language: a TCP
text protocol, a Modbus TCP handshake, an OPC UA server shaped on OPC 40100, MQTT results, and
the image sources (folder, HTTP upload, GStreamer, GenICam/Aravis) a trigger grabs from.

All of them sit on one :class:`~.jobs.Line`: the same detector, queue and metrics as the HTTP
service (:mod:`spade_edge.service`)."""

from .jobs import Code, JobResult, Line, LineError

__all__ = ["Code", "JobResult", "Line", "LineError"]
