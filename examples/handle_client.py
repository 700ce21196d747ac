"""Calling audioclip-serve from another Ray Serve deployment, through handles.

Run against a running app (e.g. `make demo` in another terminal):

    .venv/bin/python examples/handle_client.py

It deploys a small "search" application next to `audioclip` that embeds texts through the
app's ingress (`serve.get_app_handle`) and one image through the image tower directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
from ray import serve

from audioclip import InvalidInputError

IMAGE = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "inputs" / "rocket.jpg"


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Search:
    async def __call__(self, query: str, image: bytes) -> dict:
        app = serve.get_app_handle("audioclip")
        texts = await app.embed_text.remote([query], normalize=True)
        images = await app.embed_image.remote([image], normalize=True)
        try:
            await app.embed_text.remote(["fine", "word " * 100])
        except InvalidInputError as err:  # typed, with the failing item's index
            rejected = f"item {err.index}: {err.reason}"
        # The tower deployments answer too: preprocessed items in, unnormalised embeddings out.
        tower = serve.get_deployment_handle("ImageEncoder", "audioclip")
        raw = await tower.embed.remote([image], {})
        return {
            "cosine": float(texts[0] @ images[0]),
            "tower_norm": float(np.linalg.norm(raw[0])),
            "rejected": rejected,
        }


if __name__ == "__main__":
    ray.init(address="auto", namespace="serve")
    handle = serve.run(Search.bind(), name="search", route_prefix=None)
    print(handle.remote("a rocket launch", IMAGE.read_bytes()).result(timeout_s=120))
    serve.delete("search")
