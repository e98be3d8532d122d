"""The SIMD block that --round-to defaults to, from the CPU features numpy detects."""

from onnxprune.measure import latency


def test_simd_block_follows_the_cpu_features():
    assert latency.simd_block({"AVX2": True, "AVX512F": True}) == 16
    assert latency.simd_block({"AVX2": True, "AVX512F": False}) == 8
    assert latency.simd_block({}) == 8
    feats = latency.cpu_features()
    assert latency.simd_block() == (16 if feats.get("AVX512F") else 8)
