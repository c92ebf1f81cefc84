import os
def test_after():
    assert "RANK" not in os.environ and "MASTER_ADDR" not in os.environ, {k: v for k, v in os.environ.items() if k in ("RANK","MASTER_ADDR","WORLD_SIZE")}
