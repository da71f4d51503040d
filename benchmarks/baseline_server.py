"""Baseline: what users write today. FastAPI + torch.nn.GRUCell, a dict of states, no batching.

Loads the same checkpoint as the real service (weights copied into torch.nn.GRUCell layers) and
answers the same ``POST /v1/sessions/{session_id}/clicks`` API, one request at a time.

    python benchmarks/baseline_server.py --model model.pt --host 127.0.0.1 --port 8001

Benchmark-only: needs fastapi (pulls in starlette + pydantic) and uvicorn.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Click(BaseModel):
    item_id: int
    k: int = 20


def build_app(model) -> FastAPI:
    if model.embedding == 0:
        raise SystemExit("the baseline supports embedding='shared' or a sized embedding, not one-hot input")
    H, L = model.hidden_size, model.num_layers
    cells = []
    sd = model.rnn.state_dict()
    for layer in range(L):
        cell = torch.nn.GRUCell(model.Wy.shape[1] if layer == 0 and model.embedding == "shared" else
                                (model.embedding if layer == 0 else H), H)
        cell.load_state_dict({"weight_ih": sd[f"weight_ih_l{layer}"], "weight_hh": sd[f"weight_hh_l{layer}"],
                              "bias_ih": sd[f"bias_ih_l{layer}"], "bias_hh": sd[f"bias_hh_l{layer}"]})
        cells.append(cell.eval())
    emb = (model.Wy if model.embedding == "shared" else model.E).detach()
    Wy, By = model.Wy.detach(), model.By.detach().squeeze(1)
    item_ids, item_index = model.item_ids, model.item_index
    states: dict[str, list[torch.Tensor]] = {}

    app = FastAPI()

    @app.post("/v1/sessions/{session_id}/clicks")
    async def click(session_id: str, req: Click):
        idx = item_index.get(req.item_id)
        if idx is None:
            raise HTTPException(422, f"unknown item id {req.item_id}")
        if not 1 <= req.k <= len(item_ids):
            raise HTTPException(422, "bad k")
        with torch.no_grad():
            h = states.get(session_id) or [torch.zeros(1, H) for _ in range(L)]
            x = emb[idx].unsqueeze(0)
            new = []
            for cell, hl in zip(cells, h):
                x = cell(x, hl)
                new.append(x)
            states[session_id] = new
            scores = torch.addmm(By, x, Wy.t())[0]
            v, i = torch.topk(scores, req.k)
        return {"items": [item_ids[j] for j in i.tolist()], "scores": v.tolist()}

    @app.delete("/v1/sessions/{session_id}")
    async def end(session_id: str):
        if states.pop(session_id, None) is None:
            raise HTTPException(404, "unknown session")
        return {"deleted": True}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "sessions": len(states)}

    return app


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--torch-threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.torch_threads > 0:
        torch.set_num_threads(a.torch_threads)
    sys.path.insert(0, ROOT)
    import uvicorn

    from rnnrec_fast.recsys import load_checkpoint

    app = build_app(load_checkpoint(a.model))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.host, a.port))
    sock.listen(2048)
    print(f"baseline: listening on http://{a.host}:{sock.getsockname()[1]}", flush=True)
    # uvicorn's defaults (uvloop + httptools when installed), as a typical deployment runs it
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


if __name__ == "__main__":
    main()
