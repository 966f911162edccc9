import Foundation
import PhalanxRuntime
import SWR

/// Gate regimes that stress different parts of the operators.
enum GateRegime: CaseIterable, CustomStringConvertible {
    case uniform, nearZero, nearOne, edges
    var description: String { "\(self)" }

    func draw(_ count: Int, _ rng: inout SeededGenerator) -> [Float] {
        (0..<count).map { _ in
            switch self {
            case .uniform: Float.random(in: 0...1, using: &rng)
            case .nearZero: Float(pow(10, Double.random(in: -9 ... -2, using: &rng)))
            case .nearOne: Float(1 - pow(10, Double.random(in: -7 ... -2, using: &rng)))
            case .edges: [0, 1, 1e-12, 1 - 1.0 / 1_048_576, 0.5][Int.random(in: 0..<5, using: &rng)]
            }
        }
    }
}

/// A pool of one thread: every call is cut into the fewest work items, so all heads of a sequence
/// land in one item (with 16 heads, the kernels' unrolled 16-head path).
let oneThread = WorkerPool(threadCount: 1)

/// Runs the jagged window on arrays (a fresh state unless one is given).
func jagged(_ window: JaggedWindow, gates: [Float], inputs: [Float], layout: SequenceLayout,
            state: inout JaggedState, pool: WorkerPool = .shared) -> [Float] {
    var out = [Float](repeating: .nan, count: inputs.count)
    gates.withUnsafeBufferPointer { a in
        inputs.withUnsafeBufferPointer { u in
            out.withUnsafeMutableBufferPointer { y in
                window.forward(gates: a, inputs: u, output: y, layout: layout, state: &state, pool: pool)
            }
        }
    }
    return out
}

func jagged(_ window: JaggedWindow, gates: [Float], inputs: [Float], layout: SequenceLayout) -> [Float] {
    var state = JaggedState(for: layout, blockLength: window.blockLength)
    return jagged(window, gates: gates, inputs: inputs, layout: layout, state: &state)
}

func exact(gates: [Float], inputs: [Float], layout: SequenceLayout, state: inout ExactState,
           pool: WorkerPool = .shared) -> [Float] {
    var out = [Float](repeating: .nan, count: inputs.count)
    gates.withUnsafeBufferPointer { a in
        inputs.withUnsafeBufferPointer { u in
            out.withUnsafeMutableBufferPointer { y in
                ExactRecurrence().forward(gates: a, inputs: u, output: y, layout: layout, state: &state, pool: pool)
            }
        }
    }
    return out
}

/// The fixture folder of this test target (`Bundle.module` is per target, so this stays here).
func fixture(_ name: String) -> URL {
    Bundle.module.url(forResource: "Fixtures/\(name)", withExtension: nil)!
}
