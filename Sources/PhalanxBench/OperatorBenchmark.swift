import Foundation
import PhalanxRuntime
import SWR

/// Benchmark of the SWR operators against this machine's copy bandwidth.
///
/// Every operator here is memory-bound: it reads its inputs and writes its outputs once. Its
/// effective bandwidth is (bytes it must read + bytes it must write) / median time, reported as
/// a fraction of the copy bandwidth measured in the same run, with all threads of the pool.
public struct OperatorBenchmark {
    /// The shape of the call every operator is timed on, and how many times.
    public struct Configuration: Sendable {
        /// Sequences in the uniform batch.
        public var batch = 4
        /// Positions per sequence.
        public var length = 65536
        /// Heads per position.
        public var heads = 16
        /// Channels per head.
        public var headDim = 16
        /// Timed calls per operator, after one warm-up; the median is reported.
        public var repeats = 9
        /// Only operators whose name contains this text (all when nil).
        public var only: String?
        /// The defaults: 4 sequences of 65536 positions, 16 heads of 16, 9 repeats, every operator.
        public init() {}
    }

    /// One operator's time and bandwidth.
    public struct Result: Sendable {
        /// The operator and direction timed (`jagged k=2 forward`).
        public let name: String
        /// Median time of the operator.
        public let seconds: Double
        /// Bytes the operator must read and write.
        public let bytes: Int
        /// Median over repeats of (operator bandwidth / copy bandwidth measured just before it).
        public let fractionOfCopy: Double
        /// Effective bandwidth in bytes per second: `bytes / seconds`.
        public var bandwidth: Double { Double(bytes) / seconds }
    }

    /// The shape and repeats every operator is timed with.
    public let configuration: Configuration
    /// The threads the operators run on.
    public let pool: WorkerPool

    /// A benchmark of `configuration` on `pool`.
    public init(_ configuration: Configuration, pool: WorkerPool = .shared) {
        self.configuration = configuration
        self.pool = pool
    }

    /// Times every operator; `log` receives one line per result as soon as it exists.
    public func run(log: (Result) -> Void) -> [Result] {
        let c = configuration
        let layout = SequenceLayout.batched(batch: c.batch, length: c.length, heads: c.heads, headDim: c.headDim)
        let gates = BenchBuffer(count: layout.gateCount) { 0.5 + 0.49 * sin(Float($0)) }
        let inputs = BenchBuffer(count: layout.elementCount) { cos(Float($0 % 9973)) }
        let outputs = BenchBuffer(count: layout.elementCount) { _ in 0 }
        let cotangent = BenchBuffer(count: layout.elementCount) { sin(Float($0 % 7919)) }
        let inputGradient = BenchBuffer(count: layout.elementCount) { _ in 0 }
        let gateGradient = BenchBuffer(count: layout.gateCount) { _ in 0 }
        let gateBytes = layout.gateCount * 4, elementBytes = layout.elementCount * 4
        // Forward: read a and u, write y. Backward: read a, u (or x) and dy, write du and da.
        let forwardBytes = gateBytes + 2 * elementBytes
        let backwardBytes = 2 * gateBytes + 3 * elementBytes

        var results: [Result] = []
        // The machine is shared and its bandwidth drifts: every repeat times a copy of the same
        // number of bytes right before the operator (the faster of `MachineCeilings.copy`'s two
        // ways), and the ratio is taken pairwise.
        let copySource = BenchBuffer(count: backwardBytes / 8) { Float($0 & 1023) }
        let copyDestination = BenchBuffer(count: backwardBytes / 8) { _ in 0 }
        func copy(_ bytes: Int) -> Double {
            let src = copySource.pointer.baseAddress!, dst = copyDestination.pointer.baseAddress!
            return [false, true].map { streaming in
                Timing.seconds { MachineCeilings.copy(src, dst, count: bytes / 8, streaming: streaming, pool: pool) }
            }.min()!
        }
        func measure(_ name: String, bytes: Int, _ body: () -> Void) {
            if let only = c.only, !name.contains(only) { return }
            body()
            var times: [Double] = [], ratios: [Double] = []
            for _ in 0..<c.repeats {
                let copySeconds = copy(bytes)
                let seconds = Timing.seconds(body)
                times.append(seconds)
                ratios.append(copySeconds / seconds)
            }
            let result = Result(name: name, seconds: median(times), bytes: bytes, fractionOfCopy: median(ratios))
            results.append(result)
            log(result)
        }
        let jagged = JaggedWindow(), local = JaggedWindow(blocksSeen: 1)
        measure("jagged k=2 forward", bytes: forwardBytes) {
            var state = JaggedState(for: layout)
            jagged.forward(gates: gates.readOnly, inputs: inputs.readOnly, output: outputs.pointer,
                           layout: layout, state: &state, pool: pool)
        }
        measure("jagged k=2 backward", bytes: backwardBytes) {
            jagged.backward(gates: gates.readOnly, inputs: inputs.readOnly, outputGradient: cotangent.readOnly,
                            layout: layout, initialState: JaggedState(for: layout),
                            inputGradient: inputGradient.pointer, gateGradient: gateGradient.pointer, pool: pool)
        }
        measure("jagged k=1 forward", bytes: forwardBytes) {
            var state = JaggedState(for: layout)
            local.forward(gates: gates.readOnly, inputs: inputs.readOnly, output: outputs.pointer,
                          layout: layout, state: &state, pool: pool)
        }
        measure("exact forward", bytes: forwardBytes) {
            var state = ExactState(for: layout)
            ExactRecurrence().forward(gates: gates.readOnly, inputs: inputs.readOnly, output: outputs.pointer,
                                      layout: layout, state: &state, pool: pool)
        }
        measure("exact backward", bytes: backwardBytes) {
            ExactRecurrence().backward(gates: gates.readOnly, outputs: outputs.readOnly,
                                       outputGradient: cotangent.readOnly, layout: layout,
                                       initialState: ExactState(for: layout), inputGradient: inputGradient.pointer,
                                       gateGradient: gateGradient.pointer, pool: pool)
        }
        return results
    }

    private func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        let n = sorted.count
        return n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}
