import PhalanxDistributed
import PhalanxLayers
import Testing

@Suite("Gradient bucket plan")
struct GradientBucketPlanTests {
    @Test("reverse order; first bucket within 1 MiB, later ones within 25 MiB; an oversized gradient alone")
    func ddpCaps() {
        let mib = 1 << 20
        // Model order: embedding 40 MiB, then 12 gradients of 3 MiB, then a 0.25 MiB norm and a 0.5 MiB bias.
        let sizes = [40 * mib] + Array(repeating: 3 * mib, count: 12) + [mib / 4, mib / 2]
        let names = sizes.indices.map { "p\($0)" }
        let plan = GradientBucketPlan(names: names, byteCounts: sizes)
        #expect(plan.buckets.map(\.parameters) == [[14, 13], [12, 11, 10, 9, 8, 7, 6, 5], [4, 3, 2, 1], [0]])
        #expect(plan.buckets.map(\.byteCount) == [3 * mib / 4, 24 * mib, 12 * mib, 40 * mib])
        #expect(plan.buckets[0].byteCount <= mib && plan.buckets.dropFirst().allSatisfy { $0.byteCount <= 25 * mib || $0.parameters.count == 1 })
        // Every parameter exactly once.
        #expect(plan.buckets.flatMap(\.parameters).sorted() == Array(sizes.indices))
    }

    @Test("a bucket is closed when the next gradient would pass the cap, not after; equal to the cap fits")
    func boundaries() {
        let plan = GradientBucketPlan(names: ["a", "b", "c", "d", "e"], byteCounts: [4, 4, 6, 2, 2], firstCap: 4, cap: 10)
        // Reverse: e(2) d(2) | c(6) b(4) | a(4): first cap 4 holds e+d; then c+b = 10 (= cap); a alone.
        #expect(plan.buckets.map(\.parameters) == [[4, 3], [2, 1], [0]])
        #expect(plan.signature == "e:2,d:2|c:6,b:4|a:4")
    }

    @Test("the plan depends only on names and sizes: equal on every rank, different when the model differs")
    func identicalAcrossRanks() {
        func model() -> [Parameter] {
            [Parameter("embed.weight", Tensor(zeros: [256, 64]), decays: false),
             Parameter("layers.0.proj.weight", Tensor(zeros: [64, 64]), decays: true),
             Parameter("norm.weight", Tensor(zeros: [64]), decays: false)]
        }
        let a = GradientBucketPlan(model(), firstCap: 20_000, cap: 70_000)
        let b = GradientBucketPlan(model(), firstCap: 20_000, cap: 70_000)
        #expect(a == b && a.signature == b.signature)
        #expect(a.signature == "norm.weight:256,layers.0.proj.weight:16384|embed.weight:65536")
        let parameters = model()
        #expect(a.gradients(of: a.buckets[0], in: parameters).map(\.shape) == [[64], [64, 64]])
        let other = GradientBucketPlan(names: ["embed.weight", "layers.0.proj.weight", "norm.weight"],
                                       byteCounts: [65536, 16384, 512], firstCap: 20_000, cap: 70_000)
        #expect(other.signature != a.signature)
    }

    @Test("no parameters, no buckets")
    func empty() {
        #expect(GradientBucketPlan(names: [], byteCounts: []).buckets.isEmpty)
    }
}
