/// Exponentials and the logistic function on 16 lanes, for the element-wise passes around the
/// matrix products (gates, SwiGLU, softmax, attention). The C library's `expf` is a call per
/// element; these are a handful of fused multiply-adds per 16 elements.

/// Both exponentials round `x` to an integer `n` by adding `1.5 * 2^23`: the sum's low mantissa
/// bits then hold `n`.
@inlinable @inline(__always) var roundingMagic: SIMD16<Float> { SIMD16(repeating: 12_582_912) }

/// `2^n` for `n` rounded by `shifted = t + roundingMagic` (lane by lane, `-127 <= n <= 127`),
/// built directly in the exponent bits; `n = -127` gives 0.
@inlinable @inline(__always)
func powerOfTwo(rounded shifted: SIMD16<Float>) -> SIMD16<Float> {
    let n = unsafeBitCast(shifted, to: SIMD16<Int32>.self) &- unsafeBitCast(roundingMagic, to: SIMD16<Int32>.self)
    return unsafeBitCast((n &+ 127) &<< 23, to: SIMD16<Float>.self)
}

/// `2^x` lane by lane for `x <= 127`, relative error about 2e-7, and exactly 0 for `x <= -127`
/// (so `-inf` gives 0):
///
///     2^x = 2^n * 2^f,   n = round(x),  f = x - n in [-1/2, 1/2]
///
/// with `2^f` a degree-6 polynomial (Cephes `exp2f`) and `2^n` built in the exponent bits; below
/// -127 the clamp makes `n = -127`, whose exponent field is 0, so the product is 0 without a
/// separate test.
@inlinable @inline(__always)
public func exp2(_ x: SIMD16<Float>) -> SIMD16<Float> {
    let clamped = x.replacing(with: -127, where: x .< -127)
    let shifted = clamped + roundingMagic
    let n = shifted - roundingMagic
    let f = clamped - n
    var p = SIMD16<Float>(repeating: 1.535336188319500e-4)
    p = SIMD16(repeating: 1.339887440266574e-3).addingProduct(p, f)
    p = SIMD16(repeating: 9.618437357674640e-3).addingProduct(p, f)
    p = SIMD16(repeating: 5.550332471162809e-2).addingProduct(p, f)
    p = SIMD16(repeating: 2.402264791363012e-1).addingProduct(p, f)
    p = SIMD16(repeating: 6.931472028550421e-1).addingProduct(p, f)
    p = SIMD16(repeating: 1).addingProduct(p, f)
    return p * powerOfTwo(rounded: shifted)
}

/// `e^x` lane by lane, within about 2 ulp of the exact value; 0 below -87.3 (so `-inf` gives 0),
/// `+inf` above 88 (so the logistic of a very negative number is 0), NaN stays NaN:
///
///     e^x = 2^n * e^r,   n = round(x / ln 2),  r = x - n ln 2 in [-ln2/2, ln2/2]
///
/// with `n ln 2` subtracted in two parts (Cody-Waite) so that `r` is exact to float precision,
/// and `e^r = 1 + r + r^2 p(r)`, `p` of degree 5 (Cephes `expf`).
@inlinable @inline(__always)
public func exp(_ x: SIMD16<Float>) -> SIMD16<Float> {
    let low = SIMD16<Float>(repeating: -87.3), high = SIMD16<Float>(repeating: 88)
    let clamped = x.replacing(with: low, where: x .< low).replacing(with: high, where: x .> high)
    let shifted = roundingMagic.addingProduct(clamped, SIMD16(repeating: 1.442_695_04))
    let n = shifted - roundingMagic
    let r = clamped.addingProduct(n, SIMD16(repeating: -0.693_359_375)).addingProduct(n, SIMD16(repeating: 2.121_944_4e-4))
    var p = SIMD16<Float>(repeating: 1.987_569_15e-4)
    p = SIMD16(repeating: 1.398_199_950_7e-3).addingProduct(p, r)
    p = SIMD16(repeating: 8.333_451_907_3e-3).addingProduct(p, r)
    p = SIMD16(repeating: 4.166_579_589_4e-2).addingProduct(p, r)
    p = SIMD16(repeating: 1.666_666_545_9e-1).addingProduct(p, r)
    p = SIMD16(repeating: 5.000_000_120_1e-1).addingProduct(p, r)
    let er = (r + 1).addingProduct(p, r * r)
    let result = er * powerOfTwo(rounded: shifted)
    return result.replacing(with: 0, where: x .< low).replacing(with: .infinity, where: x .> high)
}

/// The logistic function `1 / (1 + e^-z)` lane by lane (see `exp` for its accuracy).
@inlinable @inline(__always)
public func sigmoid(_ z: SIMD16<Float>) -> SIMD16<Float> { 1 / (1 + exp(-z)) }

/// `1 / (1 + e^-z)` for one number, with the same polynomial as the vector form so that
/// vector bodies and their scalar tails agree.
@inlinable @inline(__always)
public func sigmoid(_ z: Float) -> Float { sigmoid(SIMD16(repeating: z))[0] }

/// `p[i] = scale * sigmoid(p[i])` for `i < count`, 16 at a time.
@inlinable
public func applySigmoid(_ p: UnsafeMutablePointer<Float>, count: Int, scale: Float = 1) {
    var i = 0
    while i + 16 <= count {
        store16(scale * sigmoid(load16(p + i)), p + i)
        i += 16
    }
    while i < count {
        p[i] = scale * sigmoid(p[i])
        i += 1
    }
}
