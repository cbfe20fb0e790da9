"""PLC-side bridges: `inspectd bridge mqtt|opcua --config FILE`.

Each bridge is its own process (its own systemd unit): it subscribes to the daemon's verdict
stream with `VerdictSubscriber` (CURVE when the config's zmq section has keys) and republishes
verdicts and line status to MQTT (`mqtt.py`) or an OPC UA server (`opcua.py`). A slow or broken
bridge cannot stall inspection: the daemon's PUB socket drops at its high-water mark, and the
subscriber reports the gap. ZeroMQ reconnects to a restarted daemon on its own; the MQTT client
reconnects to a restarted broker and republishes the retained status.
"""
