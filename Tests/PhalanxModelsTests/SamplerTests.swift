import Foundation
import PhalanxModels
import PhalanxRuntime
import PhalanxTestSupport
import Testing

/// The token sampler against the distribution it promises:
///
///     p_j ∝ exp(z_j / T) over the k most likely tokens, then over the smallest most likely set whose
///     probability reaches topP; T = 0 is greedy.
@Suite("Token sampler")
struct SamplerTests {
    /// Logits of known probabilities (their softmax at temperature 1).
    static let probabilities: [Double] = [0.05, 0.30, 0.10, 0.25, 0.02, 0.18, 0.06, 0.04]
    static let logits = probabilities.map { Float(log($0)) }

    /// How often each token comes out of `draws` samples.
    static func frequencies(_ sampler: inout TokenSampler, _ logits: [Float], draws: Int) -> [Double] {
        var counts = [Int](repeating: 0, count: logits.count)
        logits.withUnsafeBufferPointer { z in
            for _ in 0..<draws { counts[Int(sampler.sample(z))] += 1 }
        }
        return counts.map { Double($0) / Double(draws) }
    }

    /// `softmax(z / T)` over `kept` (zero elsewhere), in double precision.
    static func expected(_ logits: [Float], temperature: Double, kept: Set<Int>) -> [Double] {
        let weights = logits.indices.map { kept.contains($0) ? exp(Double(logits[$0]) / temperature) : 0 }
        let total = weights.reduce(0, +)
        return weights.map { $0 / total }
    }

    /// Every token's frequency within 5 standard deviations of its probability (a binomial count
    /// of `draws`): a correct sampler fails this for about one seed in a million, while a wrong
    /// temperature, a wrong kept set or a biased draw moves some frequency by many deviations.
    static func expectMatches(_ frequencies: [Double], _ expected: [Double], draws: Int, _ comment: String,
                              sourceLocation: SourceLocation = #_sourceLocation) {
        for (j, (f, p)) in zip(frequencies, expected).enumerated() {
            let bound = 5 * (p * (1 - p) / Double(draws)).squareRoot()
            if p == 0 {
                #expect(f == 0, "\(comment): token \(j) is outside the kept set but was drawn (\(f))", sourceLocation: sourceLocation)
            } else {
                #expect(abs(f - p) <= bound, "\(comment): token \(j) frequency \(f), probability \(p), bound \(bound)",
                        sourceLocation: sourceLocation)
            }
        }
    }

    @Test("temperature 0 is greedy: the most likely token, the first of equals, whatever the seed")
    func greedy() {
        var rng = SeededGenerator(seed: 61)
        for seed in 0..<20 {
            var logits = randomInputs(50, scale: 3, &rng)
            let top = logits.indices.max { logits[$0] < logits[$1] }!
            var sampler = TokenSampler(temperature: 0, seed: UInt64(seed))
            #expect(logits.withUnsafeBufferPointer { sampler.sample($0) } == Int32(top))
            logits[7] = logits[top]  // a tie: the lower index wins
            #expect(logits.withUnsafeBufferPointer { sampler.sample($0) } == Int32(min(7, top)))
        }
    }

    @Test("top-k 1 is the most likely token at any temperature and top-p")
    func topKOne() {
        var rng = SeededGenerator(seed: 62)
        for temperature: Float in [0.5, 1, 5] {
            var sampler = TokenSampler(temperature: temperature, topK: 1, topP: 0.9, seed: 3)
            for _ in 0..<50 {
                let logits = randomInputs(20, scale: 2, &rng)
                let top = logits.indices.max { logits[$0] < logits[$1] }!
                #expect(logits.withUnsafeBufferPointer { sampler.sample($0) } == Int32(top), "temperature \(temperature)")
            }
        }
    }

    @Test("at temperature 1, 0.6 and 2, frequencies over 40000 draws match softmax(z / T)", arguments: [1.0, 0.6, 2.0])
    func temperature(_ temperature: Double) {
        var sampler = TokenSampler(temperature: Float(temperature), seed: 63)
        let draws = 40_000
        let f = Self.frequencies(&sampler, Self.logits, draws: draws)
        Self.expectMatches(f, Self.expected(Self.logits, temperature: temperature, kept: Set(Self.logits.indices)),
                           draws: draws, "T \(temperature)")
    }

    @Test("as the temperature goes to 0, the most likely token's share rises to 1")
    func coolingToGreedy() {
        var shares: [Double] = []
        for temperature: Float in [1, 0.3, 0.1, 0.02] {
            var sampler = TokenSampler(temperature: temperature, seed: 64)
            shares.append(Self.frequencies(&sampler, Self.logits, draws: 5000)[1])
        }
        #expect(zip(shares, shares.dropFirst()).allSatisfy { $0 < $1 }, "shares \(shares)")
        // At 0.02 the runner-up (0.25 against 0.30) has weight (0.25/0.30)^50 = 1e-4 of the top.
        #expect(shares.last! > 0.998, "shares \(shares)")
    }

    @Test("top-k keeps exactly the k most likely tokens, in proportion")
    func topK() {
        var sampler = TokenSampler(temperature: 1, topK: 3, seed: 65)
        let draws = 40_000
        let f = Self.frequencies(&sampler, Self.logits, draws: draws)
        Self.expectMatches(f, Self.expected(Self.logits, temperature: 1, kept: [1, 3, 5]), draws: draws, "top-3")
    }

    /// Sorted probabilities 0.30, 0.25, 0.18, 0.10, ...: cumulative 0.30, 0.55, 0.73, 0.83.
    @Test("top-p keeps the smallest set of most likely tokens whose probability reaches p",
          arguments: [(0.2, [1]), (0.5, [1, 3]), (0.54, [1, 3]), (0.56, [1, 3, 5]), (0.8, [1, 3, 5, 2])] as [(Float, [Int])])
    func topP(_ p: Float, kept: [Int]) {
        var sampler = TokenSampler(temperature: 1, topP: p, seed: 66)
        let draws = 40_000
        let f = Self.frequencies(&sampler, Self.logits, draws: draws)
        Self.expectMatches(f, Self.expected(Self.logits, temperature: 1, kept: Set(kept)), draws: draws, "top-p \(p)")
    }

    @Test("top-p applies to the distribution after temperature and top-k")
    func topPAfterTopK() {
        // Top-4 at T = 1 renormalises 0.30, 0.25, 0.18, 0.10 to 0.361, 0.301, 0.217, 0.120:
        // top-p 0.85 then keeps three (cumulative 0.880), where over all eight it would keep five
        // (0.73, 0.83, 0.89).
        var sampler = TokenSampler(temperature: 1, topK: 4, topP: 0.85, seed: 67)
        let draws = 40_000
        let f = Self.frequencies(&sampler, Self.logits, draws: draws)
        Self.expectMatches(f, Self.expected(Self.logits, temperature: 1, kept: [1, 3, 5]), draws: draws, "top-4, top-p 0.85")
    }

    @Test("the same seed draws the same tokens; another seed, others")
    func seeds() {
        func tokens(seed: UInt64) -> [Int32] {
            var sampler = TokenSampler(temperature: 1.2, topK: 6, topP: 0.95, seed: seed)
            return Self.logits.withUnsafeBufferPointer { z in (0..<300).map { _ in sampler.sample(z) } }
        }
        #expect(tokens(seed: 5) == tokens(seed: 5))
        #expect(tokens(seed: 5) != tokens(seed: 6))
    }
}
