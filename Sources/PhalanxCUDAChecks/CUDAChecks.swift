import Foundation
import PhalanxCUDA

/// Every GPU-against-CPU comparison of this package, as `phalanx bench cuda --check` runs them on
/// a GPU machine without a Swift toolchain (the tests run the same cases one by one).
public enum CUDAChecks {
    /// Every case of the tests against the CPU (jagged operator, layer, exact recurrence, training
    /// layers, attention), one PASS/FAIL line each; returns the number of failures.
    public static func runAll(device: CUDADevice) throws -> (passed: Int, failed: Int) {
        let context = device.context
        var failures = 0, total = 0
        func report(_ title: String, _ outcomes: () throws -> [(line: String, passed: Bool)]) rethrows {
            print("\nCheck: \(title)")
            let results = try outcomes()
            for result in results { print("  \(result.line)") }
            let failed = results.filter { !$0.passed }.count
            print("  \(results.count - failed) passed, \(failed) failed")
            failures += failed
            total += results.count
        }
        try report("the GPU training layers (RMSNorm, RoPE, SwiGLU, embedding, dropout, cross-entropy, clip, AdamW) against the CPU") {
            try CUDALayerKernelsCheck.runAll(context: context).map { ("\($0)", $0.passed) }
        }
        try report("the GPU jagged window against the CPU JaggedWindow") {
            try CUDAJaggedWindowCheck.standardCases.map {
                let outcome = try CUDAJaggedWindowCheck.run($0, context: context)
                return ("\(outcome)", outcome.passed)
            }
        }
        try report("PhalanxLayer on the GPU against the CPU (output, dx, every parameter gradient)") {
            try CUDAPhalanxLayerCheck.standardCases.map {
                let outcome = try CUDAPhalanxLayerCheck.run($0, device: device)
                return ("\(outcome)", outcome.passed)
            }
        }
        try report("the GPU exact recurrence (hierarchical) against the CPU ExactRecurrence") {
            try CUDAExactRecurrenceCheck.standardCases.map {
                let outcome = try CUDAExactRecurrenceCheck.run($0, context: context)
                return ("\(outcome)", outcome.passed)
            }
        }
        try report("the GPU attention against the CPU AttentionKernel (output, lse, dq, dk, dv)") {
            try CUDAAttentionCheck.standardCases.map {
                let outcome = try CUDAAttentionCheck.run($0, context: context)
                return ("\(outcome)", outcome.passed)
            }
        }
        try report("the GPU attention is deterministic (two runs bit-identical)") {
            try CUDAAttentionCheck.determinismCases.map {
                let same = try CUDAAttentionCheck.isDeterministic($0, context: context)
                return ("\(same ? "PASS" : "FAIL") \($0): \(same ? "bit-identical" : "outputs differ between runs")", same)
            }
        }
        try report("cuDNN's fused attention against the CPU AttentionKernel (bf16; skipped where cuDNN is absent or declines)") {
            try CUDNNAttentionCheck.runAll(context: context)
        }
        try report("the whole model on the GPU against the CPU (loss, every gradient, the AdamW update)") {
            try CUDAModelCheck.standardCases.map {
                let outcome = try CUDAModelCheck.run($0, device: device)
                return ("\(outcome)", outcome.passed)
            }
        }
        try report("decoding on the GPU against its parallel forward, CPU decoding, and ragged prompts decoded alone") {
            try CUDADecodeCheck.standardCases.map {
                let outcome = try CUDADecodeCheck.run($0, device: device)
                return ("\(outcome)", outcome.passed)
            }
        }
        print("\ncheck: \(total - failures) passed, \(failures) failed")
        return (total - failures, failures)
    }
}
