"""The runtime path never imports torch (checked in a fresh interpreter)."""

import subprocess
import sys
import textwrap


def test_runtime_inference_imports_no_torch(lite0_onnx, elpv_normal, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from spade_edge import Detector, gallery_from_images
        from spade_edge.runtime.features import backend_from_model
        from spade_edge.render import save_heatmap
        backend = backend_from_model({str(lite0_onnx)!r})
        images = {[str(p) for p in elpv_normal[:6]]!r}
        g = gallery_from_images(backend, images[:5], {str(tmp_path / "g.gallery")!r}, show_progress=False)
        p = Detector(backend, g).predict(images[5])
        save_heatmap(p, g, {str(tmp_path)!r})
        assert p.anomaly_map.shape == (224, 224)
        print("torch" in sys.modules, "torchvision" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
