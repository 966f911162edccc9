import PhalanxBench
import Testing

@Suite("Benchmark ceilings")
struct CeilingTests {
    let ceilings = Ceilings(threads: 2, blasKernels: "test", copy: 20e9, sgemm: 100e9, fma: 60e9, peak: 200e9)

    @Test("a result above the FMA peak is an error naming it; results below are not")
    func resultAbovePeak() {
        let errors = ceilings.finish(["benchmark": "test"], rates: [("fast kernel", 250e9), ("honest kernel", 150e9)])
        #expect(errors.count == 1)
        #expect(errors.first?.contains("fast kernel at 250.0 GFLOP/s exceeds the measured FMA peak of 200.0") == true)
        #expect(ceilings.finish([:], rates: [("honest kernel", 199e9)]).isEmpty)
    }

    @Test("an sgemm rate above the peak shows the peak was measured wrong")
    func sgemmAbovePeak() {
        let wrong = Ceilings(threads: 2, blasKernels: "test", copy: 20e9, sgemm: 158e9, fma: 60e9, peak: 82.6e9)
        let errors = wrong.finish([:], rates: [])
        #expect(errors.count == 1 && errors[0].contains("sgemm 1024^3"))
    }

    @Test("a matrix-product-bound rate more than 10% above the sgemm rate shows the sgemm rate was measured low")
    func productAboveSgemm() {
        let errors = ceilings.finish([:], rates: [], productRates: [("dx = dz W_in", 144e9), ("y = mixed W_out^T", 108e9)])
        #expect(errors.count == 1)
        #expect(errors.first?.contains("dx = dz W_in at 144% of the sgemm rate") == true)
    }
}
