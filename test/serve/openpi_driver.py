"""Drives a policy server with the REAL openpi client (`openpi-client` from the package registry). Run by the
serving tests with the python of its own venv (numpy < 2); it imports nothing of this project.

    python openpi_driver.py URI PLAN_FILE RESULT_FILE

PLAN_FILE (openpi's msgpack-numpy) holds {"mode": ..., "observations": [...], "repeat": n}:
- "sequence": one client sends the observations in order. After an error reply (openpi-client's RuntimeError) it
  records whether the same client can still be used, then connects again.
- "concurrent": one client per observation, each in its own thread; they start together and each sends its
  own observation `repeat` times.
RESULT_FILE gets {"metadata", "results", "numpy", "client"}: per observation (per client and round in
"concurrent") {"reply": ...} or {"error": text, "after_error": exception name}.
"""

import sys
import threading

import numpy as np
import openpi_client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy


def sequence(uri, observations):
    client = WebsocketClientPolicy(uri)
    metadata = client.get_server_metadata()
    results = []
    for obs in observations:
        try:
            results.append({"reply": client.infer(obs)})
        except RuntimeError as exc:
            entry = {"error": str(exc)}
            try:
                client.infer(obs)
                entry["after_error"] = "none"
            except Exception as after:  # noqa: BLE001 - which exception is what we record
                entry["after_error"] = type(after).__name__
            results.append(entry)
            client = WebsocketClientPolicy(uri)
    return metadata, results


def concurrent(uri, observations, repeat):
    clients = [WebsocketClientPolicy(uri) for _ in observations]
    barrier = threading.Barrier(len(clients))
    results = [[] for _ in clients]

    def run(index):
        barrier.wait()
        for _ in range(repeat):
            results[index].append({"reply": clients[index].infer(observations[index])})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients[0].get_server_metadata(), results


def main():
    uri, plan_file, result_file = sys.argv[1:4]
    with open(plan_file, "rb") as f:
        plan = msgpack_numpy.unpackb(f.read())
    if plan["mode"] == "sequence":
        metadata, results = sequence(uri, plan["observations"])
    else:
        metadata, results = concurrent(uri, plan["observations"], plan.get("repeat", 1))
    with open(result_file, "wb") as f:
        f.write(msgpack_numpy.packb({"metadata": metadata, "results": results, "numpy": np.__version__,
                                     "client": openpi_client.__file__}))


if __name__ == "__main__":
    main()
