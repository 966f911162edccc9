import Foundation
import PhalanxRuntime
import PhalanxTestSupport
import SWR
import Testing

@Suite("Computational horizon")
struct HorizonTests {
    @Test("the horizon is the first distance whose tail is below eps",
          arguments: [0.5, 0.8, 0.9, 0.99], [1e-2, 1e-3, 1e-6])
    func smallestDistance(rho: Double, eps: Double) {
        let h = Horizon(rho: rho, eps: eps)
        #expect(h.tail(beyond: h.distance) < eps)
        if h.distance > 0 { #expect(h.tail(beyond: h.distance - 1) >= eps) }
        #expect(h.distance == Int((log(eps * (1 - rho)) / log(rho)).rounded(.up)) - 1 || h.distance == 0)
    }

    @Test("rho 0.8 and eps 1e-3 need 38 positions; a 16-block window drops at most rho^17/(1-rho)")
    func knownValues() {
        let h = Horizon(rho: 0.8, eps: 1e-3)
        #expect(h.distance == 38)
        #expect(abs(h.jaggedError(blockLength: 16) - pow(0.8, 17) / 0.2) < 1e-15)
        #expect(h.jaggedError(blockLength: 16, offset: 3) < h.jaggedError(blockLength: 16))
    }

    @Test("the jagged window's actual error stays under its bound")
    func boundHolds() {
        var rng = SeededGenerator(seed: 31)
        let rho = 0.8
        let layout = SequenceLayout.batched(batch: 1, length: 200, heads: 1, headDim: 16)
        let gates = (0..<layout.gateCount).map { _ in Float.random(in: 0...Float(rho), using: &rng) }
        let inputs = randomInputs(layout.elementCount, &rng)
        let exactOut = Reference.exactRecurrence(gates: gates.map(Double.init), inputs: inputs.map(Double.init), layout: layout).output
        let windowed = Reference.jaggedWindow(gates: gates.map(Double.init), inputs: inputs.map(Double.init),
                                              layout: layout, window: JaggedWindow()).output
        let bound = Horizon(rho: rho, eps: 1e-3).jaggedError(blockLength: 16)  // inputs bounded by 1
        #expect(zip(exactOut, windowed).allSatisfy { abs($0 - $1) <= bound })
    }
}
