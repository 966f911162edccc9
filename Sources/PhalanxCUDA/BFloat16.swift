/// bfloat16 as raw bits (`UInt16`): the upper half of a float32, rounded to nearest even.
public enum BFloat16 {
    /// The bfloat16 nearest to `value` (ties to even); NaN becomes the quiet NaN `0x7FC0`.
    @inlinable
    public static func bits(_ value: Float) -> UInt16 {
        let u = value.bitPattern
        if u & 0x7fff_ffff > 0x7f80_0000 { return 0x7fc0 }
        return UInt16(truncatingIfNeeded: (u &+ 0x7fff &+ ((u >> 16) & 1)) >> 16)
    }

    /// The float32 equal to bfloat16 `bits` (exact).
    @inlinable
    public static func float(_ bits: UInt16) -> Float {
        Float(bitPattern: UInt32(bits) << 16)
    }

    /// Each of `values` as its nearest bfloat16 (see `bits(_:)` for one value).
    public static func bits(_ values: [Float]) -> [UInt16] { values.map(bits) }

    /// Each bfloat16 of `bits` as the float32 equal to it.
    public static func floats(_ bits: [UInt16]) -> [Float] { bits.map(float) }

    /// `values` rounded to the nearest bfloat16 and back.
    public static func rounded(_ values: [Float]) -> [Float] { values.map { float(bits($0)) } }
}
