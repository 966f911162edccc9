import Foundation
import SWR
import Testing

@Suite("Horizon at the limits of Double and Int")
struct HorizonLimitsTests {
    @Test("a subnormal eps gives a finite horizon with the defining property", arguments: [0.5, 0.8, 0.999])
    func subnormalEps(rho: Double) {
        let h = Horizon(rho: rho, eps: 5e-324)
        #expect(h.distance > 0)
        #expect(h.tail(beyond: h.distance) < h.eps && h.tail(beyond: h.distance - 1) >= h.eps)
    }

    @Test("rho just below 1 with a tiny eps answers in well under a second")
    func nearOneIsFast() {
        let start = Date()
        let h = Horizon(rho: 0.9999999999999999, eps: 1e-300)
        let d = h.distance
        #expect(Date().timeIntervalSince(start) < 1)
        #expect(h.tail(beyond: d) < h.eps && h.tail(beyond: d - 1) >= h.eps)
    }

    @Test("block lengths and offsets up to Int.max give a bound, not a trap")
    func hugeBlockLength() {
        let h = Horizon(rho: 0.8, eps: 1e-3)
        #expect(h.jaggedError(blockLength: Int.max) == 0)
        #expect(h.jaggedError(blockLength: Int.max, offset: Int.max) == 0)
        #expect(h.tail(beyond: Int.max) == 0)
    }
}
